"""LAM-A2E core: the network, checkpoint loading, audio decoding, post-processing
and the whole-clip / streaming inference paths. Nothing here knows about HTTP."""
