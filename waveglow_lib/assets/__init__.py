"""Bundled demo model and demo corpus, and the scripts that regenerate them."""
