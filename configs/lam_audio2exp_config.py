# LAM-A2E non-streaming variant: transformer on top of the identity encoder
# and 5016 identities. Same rules as the streaming config: assignments only.

weight = "pretrained_models/lam_audio2exp.tar"
audio_sr = 16000
fps = 30.0

model = dict(
    type="DefaultEstimator",
    backbone=dict(
        type="Audio2Expression",
        pretrained_encoder_type="wav2vec",
        pretrained_encoder_path="facebook/wav2vec2-base-960h",
        wav2vec2_config_path="configs/wav2vec2_config.json",
        num_identity_classes=5016,
        identity_feat_dim=64,
        hidden_dim=512,
        expression_dim=52,
        norm_type="ln",
        use_transformer=True,
        num_attention_heads=8,
        num_transformer_layers=6,
    ),
)
