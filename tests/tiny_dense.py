"""Tiny models of the dense families beyond the decoder-only core: ALiBi and Cohere decoders, encoder-decoders,
vision encoders and CNN classifiers, built from transformers config classes with a fixed seed (float64, eval)."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 96
DECODERS = ("cohere", "cohere2", "bloom", "mpt")
SEQ2SEQ = ("bart", "mbart", "marian", "pegasus", "t5", "mt5", "longt5")
VISION = ("dinov2", "dinov2_registers", "siglip", "siglip2", "clip", "deit", "beit", "swin")
CNNS = ("resnet", "convnext", "convnextv2", "efficientnet")
FAMILIES = DECODERS + SEQ2SEQ + VISION + CNNS
#: Families whose transformers classes have no sdpa attention (eager only).
EAGER_ONLY = ("bloom", "mpt", "longt5") + CNNS

_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
_BART = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
             dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
             eos_token_id=2, decoder_start_token_id=2)
_T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
           relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
           decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
_VIT = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_TOWER = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=48)
_TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)


def _decoder(family):
    if family == "cohere":
        return tf.CohereConfig(**_DECODER, pad_token_id=0, bos_token_id=0, eos_token_id=1), tf.CohereForCausalLM
    if family == "cohere2":
        return tf.Cohere2Config(**_DECODER, sliding_window=4, pad_token_id=0, bos_token_id=0, eos_token_id=1), (
            tf.Cohere2ForCausalLM
        )
    if family == "bloom":
        # weights 10x their default scale, so that attention mixes the tokens visibly (the ALiBi scores' rule)
        return tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, initializer_range=0.2), (
            tf.BloomForCausalLM
        )
    return tf.MptConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, expansion_ratio=2,
                        attn_config={"alibi": True}, initializer_range=0.2), tf.MptForCausalLM


def _seq2seq(family):
    bart = {"bart": (tf.BartConfig, tf.BartForConditionalGeneration),
            "mbart": (tf.MBartConfig, tf.MBartForConditionalGeneration), "marian": (tf.MarianConfig, tf.MarianMTModel),
            "pegasus": (tf.PegasusConfig, tf.PegasusForConditionalGeneration)}
    if family in bart:
        config, model = bart[family]
        return config(**_BART), model
    if family == "t5":  # gated GELU feed-forward (T5 v1.1, Flan-T5)
        return tf.T5Config(**_T5, feed_forward_proj="gated-gelu"), tf.T5ForConditionalGeneration
    if family == "mt5":
        return tf.MT5Config(**_T5), tf.MT5ForConditionalGeneration
    return tf.LongT5Config(**_T5, encoder_attention_type="transient-global", local_radius=2, global_block_size=2), (
        tf.LongT5ForConditionalGeneration
    )


def _vision(family):
    if family == "dinov2":
        return tf.Dinov2Config(**_VIT, layerscale_value=0.5, use_swiglu_ffn=True), tf.Dinov2ForImageClassification
    if family == "dinov2_registers":
        return tf.Dinov2WithRegistersConfig(**_VIT, num_register_tokens=2), tf.Dinov2WithRegistersForImageClassification
    if family == "deit":  # class and distillation tokens, two heads
        return tf.DeiTConfig(**_VIT), tf.DeiTForImageClassificationWithTeacher
    if family == "beit":  # relative position bias, layer scale, mean pooling
        return tf.BeitConfig(**_VIT, use_relative_position_bias=True, layer_scale_init_value=0.5,
                             use_mean_pooling=True), tf.BeitForImageClassification
    if family == "swin":  # shifted windows with their masks, relative position bias, patch merging
        return tf.SwinConfig(image_size=16, patch_size=2, num_channels=3, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                             window_size=2, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                             drop_path_rate=0.0, use_absolute_embeddings=True), tf.SwinForImageClassification
    towers = {"siglip": (tf.SiglipConfig, tf.SiglipForImageClassification, {}),
              "siglip2": (tf.Siglip2Config, tf.Siglip2ForImageClassification, {"num_patches": 16}),
              "clip": (tf.CLIPConfig, tf.CLIPForImageClassification, {})}
    config, model, extra = towers[family]
    return config(vision_config={**_TOWER, **extra}, text_config=_TEXT, num_labels=5), model


def _cnn(family):
    if family == "resnet":  # in-place residual sums
        return tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck",
                               num_labels=5), tf.ResNetForImageClassification
    if family in ("convnext", "convnextv2"):  # depthwise convolutions, channels-last layer norms, layer scale / GRN
        config = tf.ConvNextConfig if family == "convnext" else tf.ConvNextV2Config
        model = tf.ConvNextForImageClassification if family == "convnext" else tf.ConvNextV2ForImageClassification
        return config(patch_size=2, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=5,
                      layer_scale_init_value=0.5), model
    # squeeze-and-excitation gates, depthwise convolutions, SiLU
    return tf.EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.2, hidden_dim=320,
                                 num_labels=5, dropout_rate=0.0, drop_connect_rate=0.0), (
        tf.EfficientNetForImageClassification
    )


def config_and_class(family: str):
    """The tiny configuration of ``family`` and its transformers model class."""
    for group, make in ((DECODERS, _decoder), (SEQ2SEQ, _seq2seq), (VISION, _vision), (CNNS, _cnn)):
        if family in group:
            return make(family)
    raise ValueError(family)


def build(family: str, *, attn: str = "eager", dtype=torch.float64, seed: int = 0, bias_free: bool = False):
    """A tiny model in eval mode; ``bias_free`` zeroes every bias and batch-norm mean (CNNs)."""
    config, cls = config_and_class(family)
    for part in (config, getattr(config, "vision_config", None), getattr(config, "text_config", None)):
        if part is not None:
            part._attn_implementation = attn
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lambda_1") or name.endswith("lambda_2"):  # BEiT's layer scale starts at a constant
                parameter.uniform_(0.3, 0.7)
            if parameter.dim() >= 2 and not parameter.any():  # class tokens, position embeddings and tables at 0
                parameter.normal_(0, 0.5)
            if bias_free and name.endswith("bias"):
                parameter.zero_()
        for module in model.modules():
            if family in CNNS and isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):  # unit-scale activations
                fan_in = module.weight[0].numel()
                module.weight.normal_(0, (2 / fan_in) ** 0.5)
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):  # non-trivial statistics
                module.running_mean.uniform_(-0.3, 0.3) if not bias_free else module.running_mean.zero_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(*((1.0, 2.0) if family == "efficientnet" else (0.5, 1.5)))
    return model


def inputs(family: str, *, batch: int = 1, seed: int = 1, dtype=torch.float64) -> dict:
    """Model inputs: token ids (decoder ids for encoder-decoders) or pixels (patches and shapes for SigLIP2)."""
    generator = torch.Generator().manual_seed(seed)
    if family in DECODERS:
        return {"input_ids": torch.randint(3, VOCAB, (batch, 7), generator=generator), "use_cache": False}
    if family in SEQ2SEQ:
        return {"input_ids": torch.randint(3, VOCAB, (batch, 7), generator=generator),
                "decoder_input_ids": torch.randint(3, VOCAB, (batch, 5), generator=generator), "use_cache": False}
    if family == "siglip2":  # 3 x 5 patches of 4 x 4 pixels, padded to 16 patches
        mask = torch.ones(batch, 16, dtype=torch.long)
        mask[:, 15:] = 0
        return {"pixel_values": torch.randn(batch, 16, 48, generator=generator, dtype=dtype),
                "pixel_attention_mask": mask, "spatial_shapes": torch.tensor([[3, 5]] * batch)}
    size = 32 if family in CNNS else 16
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=generator, dtype=dtype)}


def target(family: str, output) -> torch.Tensor:
    """The explained scalar: the largest logit at the last (decoder) position, or of the image."""
    logits = output.logits
    return logits[0].max() if logits.dim() == 2 else logits[0, -1].max()
