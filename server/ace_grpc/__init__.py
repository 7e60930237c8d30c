"""NVIDIA Audio2Face-3D's gRPC protocol (``A2FControllerService``), served
from the same engines and sessions as the HTTP API, so that its clients
drive our model unchanged. ``protocol`` loads the message definitions,
``audio_stream`` serves one stream, ``listener`` runs the gRPC server (and
the standard health service) beside an HTTP worker."""
