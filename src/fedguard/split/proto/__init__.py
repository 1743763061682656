"""The split-learning wire schema (``split.proto``, package ``fedguard.split.v1``) and its generated modules.

``split_pb2`` / ``split_pb2_grpc`` are generated and checked in; the command that regenerates them is at the
top of ``split.proto``.
"""
