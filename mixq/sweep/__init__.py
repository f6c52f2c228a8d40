"""`mixq sweep`: many models x variants as one graph of resumable jobs (spec -> graph -> executor -> report)."""
