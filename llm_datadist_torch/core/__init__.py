"""The state of one initialized engine: the engine, its cache table, options and locks."""
