"""What an API call does: argument rules, local operations, the requesting side of remote
operations, layer-by-layer transfer."""
