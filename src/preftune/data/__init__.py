"""Data: readers turn every supported format into one canonical example; tokenize and collate build batches."""
