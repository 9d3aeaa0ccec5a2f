"""Small, reproducible experiments from the papers, as functions that return their numbers."""
