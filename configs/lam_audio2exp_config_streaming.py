# LAM-A2E streaming model (the released lam_audio2exp_streaming.tar).
# Upstream-style config: plain assignments only. The server reads it with
# a2e.config.read_config, which parses and never executes it.

weight = "pretrained_models/lam_audio2exp_streaming.tar"  # path to model weight
audio_sr = 16000
fps = 30.0

# Defaults of the whole-clip post-processing switches.
ex_vol = False
movement_smooth = False
brow_movement = False
id_idx = 0

model = dict(
    type="DefaultEstimator",
    backbone=dict(
        type="Audio2Expression",
        pretrained_encoder_type="wav2vec",
        pretrained_encoder_path="facebook/wav2vec2-base-960h",
        wav2vec2_config_path="configs/wav2vec2_config.json",
        num_identity_classes=12,
        identity_feat_dim=64,
        hidden_dim=512,
        expression_dim=52,
        norm_type="ln",
        use_transformer=False,
        num_attention_heads=8,
        num_transformer_layers=6,
    ),
)

infer = dict(type="Audio2ExpressionInfer", verbose=True)
