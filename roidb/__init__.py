"""roidb package."""
