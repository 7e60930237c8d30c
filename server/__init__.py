"""The front doors: how clients reach the engines. REST routes and their
forms, the WebSocket stream, the Audio2Face-3D gRPC listener, the demo page
and OpenAPI, connection and upload bounds, access control, access logs,
error statuses and the HTTP side of the metrics.

A front door decodes and validates, then hands audio to an
``engine.protocol.Engine`` (``server.front``), in this process or in engine
processes through ``engine.client``; it never loads a model.
"""
