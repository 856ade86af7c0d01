"""ssl_vit."""
