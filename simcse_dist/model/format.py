"""The saved-model format: the file names and sentence-transformers modules a SimCSE model
directory is made of (written by export.py, read by load.py and card.py).

A model directory holds
- config.json, model.safetensors, tokenizer files   (AutoModel / AutoTokenizer)
- simcse_config.json {"pooler", "mlp_only_train", "mlp"} and, when "mlp", simcse_mlp.pt
- the sentence-transformers 6 files, laid out exactly as `SentenceTransformer.save()` writes
  them for the equivalent modules (checked by tests/model/test_export.py against ST itself):
  modules.json, config_sentence_transformers.json, sentence_bert_config.json and

    pooler              ST modules after the Transformer (path)
    cls (MLP kept)      Pooling cls (1_Pooling) + Dense d->d, Tanh (2_Dense)
    cls, mlp_only_train Pooling cls (1_Pooling)
    cls_before_pooler   Pooling cls (1_Pooling)
    avg                 Pooling mean (1_Pooling)
    avg_first_last      WeightedLayerPooling from layer 1, weights [1, 0, ..., 0, 1]
                        (1_WeightedLayerPooling) + Pooling mean (2_Pooling)
    avg_top2            WeightedLayerPooling from layer L-1, weights [1, 1] + Pooling mean
    last_token          Pooling lasttoken (1_Pooling); the tokenizer appends EOS and pads right

  WeightedLayerPooling is a built-in ST module (no custom code, no trust_remote_code): its
  weighted mean (sum_l w_l h_l) / sum_l w_l over hidden_states[start:] is exactly SimCSE's
  (h_1 + h_L) / 2 or (h_{L-1} + h_L) / 2. It reads all hidden states, so config.json carries
  `output_hidden_states: true` for those two poolers, as ST's own save does.
  No Normalize module: SimCSE embeddings are not normalised (cosine is unaffected).

The layout targets sentence-transformers >= 6 (module paths `sentence_transformers.base...`);
older releases cannot import those paths.
"""

from __future__ import annotations


class ExportError(ValueError):
    """A model directory cannot be exported or loaded as asked; the message says why and where."""


SIMCSE_CONFIG_NAME = "simcse_config.json"
MLP_WEIGHTS_NAME = "simcse_mlp.pt"
ST_FORMAT_VERSION = "6.0.0"  # oldest sentence-transformers that reads this layout
ST_DIRS = ("1_Pooling", "2_Pooling", "2_Dense", "1_WeightedLayerPooling")
ST_TRANSFORMER = "sentence_transformers.base.modules.transformer.Transformer"
ST_POOLING = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
ST_DENSE = "sentence_transformers.base.modules.dense.Dense"
ST_WLP = "sentence_transformers.sentence_transformer.modules.weighted_layer_pooling.WeightedLayerPooling"


def layer_weights(pooler: str, num_layers: int) -> tuple[int, list[float]]:
    """(layer_start, weights) of ST's WeightedLayerPooling over hidden_states[0..num_layers]."""
    if pooler == "avg_top2":
        return num_layers - 1, [1.0, 1.0]
    if pooler == "avg_first_last":  # hidden_states[1] and hidden_states[-1]
        if num_layers == 1:
            return 1, [1.0]
        return 1, [1.0] + [0.0] * (num_layers - 2) + [1.0]
    raise ValueError(pooler)
