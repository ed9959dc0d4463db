"""Word decoders conditioned on image features, one module per family.

Every decoder exposes the same three calls (imcap.model.decoders.base.CaptionDecoder), so
decoding (greedy, beam, sampling), SCST, ensembles and export never need to know which one
they drive. A family of your own: subclass CaptionDecoder and name it with decoder._target_.
"""
