"""Generated from proto/ec_nixl/v1/export.proto by proto/generate.py: do not edit."""
