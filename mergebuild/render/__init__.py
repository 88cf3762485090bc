"""What the user sees: the console (progress, tables, trees, JSON), the DAG as text and pictures, heatmaps."""
