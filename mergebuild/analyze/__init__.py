"""Looking at models: inspect one file, compare two."""
