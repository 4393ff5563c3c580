"""A Tinker-compatible gateway: the `tinker` SDK and tinker-cookbook recipes run unmodified on bios.

It speaks the Tinker REST protocol (JSON, and protobuf for forward_backward and results) and translates
each call onto our gRPC TrainService, which stays the single source of truth. See docs/tinker.md.
"""

SUPPORTED_SDK_VERSIONS = ("0.38.0",)  # tested with tinker-cookbook 0.6.1
