"""Generated protobuf and gRPC code for the fedcollab.v1 protocol (see protos/)."""
