"""Control plane: typed messages, their codec, and a small zmq request/reply layer."""
