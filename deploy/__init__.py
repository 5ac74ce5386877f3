"""Deploy: SavedModel export with preprocessing inside the serving signature, and its checks."""
