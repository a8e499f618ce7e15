"""SGLang rollout engine: launches (or connects to) SGLang HTTP servers and drives them.

Modules: client.py (errors, HTTP client, /generate mapping), server.py (launch, stop, health),
transport.py (weight serialization and the tensor | distributed | disk sync modes), engine.py
(SGLangEngine: the RolloutEngine protocol and the restart policy), partial.py (partial rollouts:
continue from partial tokens, abort the rest).

What we call (SGLang's native HTTP API, python/sglang/srt/entrypoints/http_server.py; tested
against 0.5.23, older releases where noted):
  GET  /health                        200 once the server can generate
  GET  /server_info                   {"version": str, ...}     (/get_server_info before)
  GET  /model_info                    {"weight_version": str, ...} (/get_model_info before; some
                                       releases also have GET /get_weight_version)
  POST /generate                      {input_ids: [[int]], sampling_params: {...}, rid: [str],
                                       return_logprob: true} -> [{text, output_ids, meta_info:
                                       {finish_reason: {type}, weight_version,
                                       output_token_logprobs: [[logprob, token_id, text]]}}]
  POST /begin_weight_update, /end_weight_update  {}  (0.5.2x: tensor and distributed pushes
                                       only inside such a session; absent before)
  POST /update_weights_from_tensor    {serialized_named_tensors: [str per TP rank],
                                       load_format, flush_cache, weight_version}
  POST /init_weights_update_group     {master_address, master_port, rank_offset, world_size,
                                       group_name, backend}
  POST /update_weights_from_distributed {names, dtypes, shapes, group_name, flush_cache,
                                       weight_version} (+ an NCCL broadcast per tensor, src 0)
  POST /destroy_weights_update_group  {group_name}
  POST /update_weights_from_disk      {model_path, weight_version}
  POST /release_memory_occupation, /resume_memory_occupation  {tags}
  POST /flush_cache, POST /get_weights_by_name {name, truncate_size}
  POST /abort_request                 {abort_all: true} (partial rollouts; the aborted /generate
                                       calls answer finish_reason {type: "abort"} with the tokens
                                       and log-probs sampled so far)
All requests carry `Authorization: Bearer <api_key>` when the server has a key (we hand it over
in a private `--config` file, never in argv). Update endpoints answer {"success": bool,
"message": str} (HTTP 400 with success false on failure in 0.5.x).

Weight sync modes (`sync_mode`):
  "tensor"       colocated: CUDA IPC handles of each bucket (no copy), SGLang's own serializer
  "distributed"  separate GPUs/nodes: one NCCL group trainer(rank 0) + every server TP rank,
                 one broadcast per tensor; the HTTP call and the broadcast run concurrently
  "disk"         fallback: sharded safetensors in `sync_dir`, then update_weights_from_disk
Only the process that iterates the weights (the trainer's rank 0 of the sync) calls this.
"""

# every public name of the four modules (each lists them in its __all__)
from rlrt_megatron.rollout.sglang import client, engine, server, transport
from rlrt_megatron.rollout.sglang.client import *  # noqa: F403
from rlrt_megatron.rollout.sglang.engine import *  # noqa: F403
from rlrt_megatron.rollout.sglang.server import *  # noqa: F403
from rlrt_megatron.rollout.sglang.transport import *  # noqa: F403

__all__ = [*client.__all__, *server.__all__, *transport.__all__, *engine.__all__]
