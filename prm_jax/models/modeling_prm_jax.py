"""Qwen2ForProcessRewardModel for transformers: the modeling file that `prm_jax.save_hf` copies into every PRM
export (with `auto_map` in config.json), so that

    AutoModel.from_pretrained(export_dir, trust_remote_code=True)

is the PRM. prm_jax itself never imports this module (it needs torch); transformers imports it from the export
directory. It is written against transformers' own `Qwen2Model` (5.x), not the released Qwen remote code, which
stopped loading after transformers 4.53.

Tensor layout (the released Qwen2.5-Math-PRM's): `model.*` is a plain Qwen2 backbone, `score.0` / `score.2` the
two Linear layers of the head Linear(h, h) -> ReLU -> Linear(h, num_labels). The output's `logits` are token-level
[batch, seq, 2]; the step reward at a step token is softmax(logits)[..., 1] there.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import TokenClassifierOutput
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model, Qwen2PreTrainedModel

OFFICIAL_STEP_TOKEN_ID = 151651  # `<extra_0>` in the Qwen2.5-Math-PRM tokenizer; vLLM's step_tag_id default


class Qwen2ForProcessRewardModel(Qwen2PreTrainedModel):
    config_class = Qwen2Config  # AutoModel registers the class against the config's class: they must agree

    def __init__(self, config: Qwen2Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = Qwen2Model(config)
        h = config.hidden_size
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, config.num_labels))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, **kwargs) -> TokenClassifierOutput:
        """Token-level class logits. `labels` ([batch, seq], -100 = ignored; only step tokens carry a label)
        gives the mean cross-entropy over labelled tokens as `loss`."""
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=False, **kwargs)
        logits = self.score(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float().reshape(-1, self.num_labels),
                                               labels.to(logits.device).reshape(-1), ignore_index=-100)
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                     attentions=out.attentions)

    @torch.no_grad()
    def step_rewards(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                     step_token_id: int | None = None) -> list[list[float]]:
        """Per sequence, P(class 1) at each step token (padding excluded), in order. The step token id defaults to
        config.json's `step_token_id` (written by prm_jax), else the released model's 151651."""
        if step_token_id is None:
            step_token_id = getattr(self.config, "step_token_id", None)
        if step_token_id is None:
            step_token_id = OFFICIAL_STEP_TOKEN_ID
        probs = self(input_ids, attention_mask=attention_mask).logits.float().softmax(-1)[..., 1]
        at_step = input_ids == step_token_id
        if attention_mask is not None:
            at_step &= attention_mask.bool()
        return [probs[b][at_step[b]].tolist() for b in range(input_ids.shape[0])]
