"""Methods on the shared engine, one short module each (``build.build_method`` picks one from a recipe)."""
