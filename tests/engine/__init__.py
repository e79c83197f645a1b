"""Engine tests of the serve area (prefix caching)."""
