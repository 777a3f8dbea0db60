"""Typed schemas of the configs, registered in Hydra's ConfigStore.

Each root config (config.yaml, chat.yaml, prepare.yaml, convert.yaml) starts from its schema
(`experiment_schema`, ...), which types every group below it: a misspelt key, a wrong type or a value
outside an Enum fails at compose time with OmegaConf's message, which names the allowed values. Semantic
checks live in validate.py.

Choices are `StrEnum`s whose member names are their values, so YAML and the command line use the plain
word (`phase.run_mode=predict`) and code compares with strings (`run_mode == "predict"`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


def choices(name: str, *values: str) -> type[StrEnum]:
    """A StrEnum whose member names are its values (OmegaConf matches a YAML word by member name)."""
    return StrEnum(name, [(v, v) for v in values], module=__name__)


DType = choices("DType", "float32", "float16", "bfloat16")
RunMode = choices("RunMode", "train", "finetune", "predict", "eval")
TRAINING_RUN_MODES = ("train", "finetune")
DataFormat = choices("DataFormat", "alpaca", "chatml", "wiki", "mindrecord", "none")
LaunchMode = choices("LaunchMode", "auto", "local", "msrun", "plan")
# "auto" only in the hardware=auto profile, replaced before anything reads it
DeviceTarget = choices("DeviceTarget", "CPU", "Ascend", "auto")
LossScaleKind = choices("LossScaleKind", "dynamic", "static", "none")
CheckpointFormat = choices("CheckpointFormat", "ckpt", "safetensors")
ChatMode = choices("ChatMode", "interactive", "demo", "batch")
Direction = choices("Direction", "hf2mf", "mf2hf", "lora_merge", "lora_peft")
ConvertDType = choices("ConvertDType", "keep", "bf16", "fp16", "fp32")


@dataclass
class Paths:
    """Roots defined once (qwen15_exp/paths.py); Hydra's run and sweep dirs are built on output_root."""
    output_root: str = "${q15.output_root:}"
    cache_root: str = "${q15.cache_root:}"


@dataclass
class ModelConfig:
    """Architecture of one Qwen1.5 size (MindFormers LlamaConfig terms)."""
    name: str = MISSING
    hf_repo: str = ""                      # where the weights come from, for the user's information
    hidden_size: int = MISSING
    num_layers: int = MISSING
    num_heads: int = MISSING
    n_kv_heads: Optional[int] = None       # None = multi-head attention (every size but 32B)
    intermediate_size: int = MISSING
    vocab_size: int = MISSING              # padded: 151936 up to 7B, 152064 from 14B
    rms_norm_eps: float = 1.0e-6
    chat_rms_norm_eps: Optional[float] = None  # 72B: base weights 1e-5, chat weights 1e-6
    theta: float = 1.0e6
    tie_word_embeddings: bool = False
    qkv_has_bias: bool = True
    max_position_embedding: int = 32768
    seq_length: int = 2048                 # default sequence length for this size (data.seq_length)
    learning_rate: float = 1.0e-6          # default learning rate for this size (phase.lr_schedule)
    trainer_model_name: str = "qwen1_5"    # trainer.model_name in the MindFormers config
    pad_token_id: int = 151643
    eos_token_id: int = 151643


@dataclass
class ParallelConfig:
    """How one run is spread over devices (MindFormers parallel_config + auto-parallel context)."""
    name: str = MISSING
    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    context_parallel: int = 1
    micro_batch_num: int = 1
    vocab_emb_dp: bool = True
    gradient_aggregation_group: int = 4
    use_seq_parallel: bool = False
    optimizer_shard: Optional[bool] = None        # parallel_config.optimizer_shard; None = key not written
    enable_parallel_optimizer: bool = False        # parallel.enable_parallel_optimizer
    parallel_optimizer_threshold: int = 64
    micro_batch_interleave_num: int = 1
    fine_grain_interleave: int = 1
    offset: Any = 0                                # int, or a list with one entry per pipeline stage
    nodes: Optional[int] = None                    # None: derived from devices / devices_per_node


@dataclass
class Precision:
    compute: DType = DType.bfloat16
    param_init: DType = DType.float32
    softmax: DType = DType.float32
    rotary: DType = DType.float32
    layernorm: DType = DType.float32


@dataclass
class Optimizer:
    type: str = "AdamW"
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1.0e-8
    weight_decay: float = 0.01


@dataclass
class LRSchedule:
    type: str = "CosineWithWarmUpLR"
    learning_rate: float = 1.0e-6
    lr_end: Optional[float] = None
    warmup_ratio: float = 0.0
    total_steps: int = -1                 # -1: MindFormers derives it from the dataset


@dataclass
class LossScale:
    kind: LossScaleKind = LossScaleKind.dynamic
    value: float = 4096.0
    factor: int = 2
    window: int = 1000


@dataclass
class Recompute:
    recompute: bool = False
    select_recompute: bool = False
    parallel_optimizer_comm_recompute: bool = False
    mp_comm_recompute: bool = False
    recompute_slice_activation: bool = False


@dataclass
class Checkpointing:
    """Complete-or-absent checkpoints, at least two kept while training (a kill during a save leaves one)."""
    prefix: str = "qwen2"
    save_steps: Optional[int] = None      # None: every `every_minutes` of estimated step time (plan.py)
    every_minutes: float = 10.0
    keep_max: int = 2
    keep_after_success: int = 1           # checkpoints kept once the run ends ok (0: none; bounds disk use)
    save_trainable_params: bool = False   # also save the trainable parameters alone (LoRA: the adapters)
    format: CheckpointFormat = CheckpointFormat.ckpt


@dataclass
class Lora:
    """LoRA through MindFormers' pet_config (pet_type lora): low-rank adapters on the Linear layers whose
    attribute name matches `target_modules` (MindFormers' regex, e.g. wq in model.layers.0.attention.wq); every
    other weight is frozen except those matching a `trainable` regex (MindFormers' freeze_exclude)."""
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str = ".*wq|.*wk|.*wv|.*wo"
    trainable: List[str] = field(default_factory=list)


@dataclass
class EvalOptions:
    """Evaluation during training: perplexity on `input` (a file in data.format, or a MindRecord of rows of
    data.seq_length tokens) every `every_steps` steps, through MindFormers' do_eval."""
    every_steps: Optional[int] = None
    input: str = ""


@dataclass
class Generation:
    use_past: bool = False
    is_dynamic: bool = False
    block_size: int = 32
    num_blocks: int = 128
    max_decode_length: int = 512          # MindFormers' cap on prompt + answer; used when max_new_tokens is null
    max_new_tokens: Optional[int] = None  # the longest answer (wins over max_decode_length, as in MindFormers)
    top_k: int = 0
    top_p: float = 0.8
    do_sample: bool = False
    temperature: Optional[float] = None
    repetition_penalty: float = 1.0
    eos_token_id: List[int] = field(default_factory=lambda: [151643])
    bos_token_id: Optional[int] = None


@dataclass
class PhaseConfig:
    """What the run does: pretrain, finetune, predict (chat = predict + the ChatML template) or eval."""

    @property
    def trains(self) -> bool:
        return self.run_mode in TRAINING_RUN_MODES

    name: str = MISSING
    run_mode: RunMode = MISSING           # MindFormers run_mode
    chat: bool = False
    export: bool = False                  # phase=export: write MindIR for MindSpore Lite instead of generating
    seed: int = 42
    batch_size: int = 1                   # runner_config.batch_size: per data-parallel rank, per micro batch
    epochs: int = 1
    max_steps: Optional[int] = None       # stop after this many steps (None: run every epoch)
    gradient_accumulation_steps: int = 1
    sink_mode: bool = True
    precision: Precision = field(default_factory=Precision)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_schedule: LRSchedule = field(default_factory=LRSchedule)
    loss_scale: LossScale = field(default_factory=LossScale)
    use_clip_grad: bool = True
    max_grad_norm: Optional[float] = None
    recompute: Recompute = field(default_factory=Recompute)
    checkpoint: Checkpointing = field(default_factory=Checkpointing)
    lora: Optional[Lora] = None           # phase=lora: adapters only; None: every weight trains
    generation: Generation = field(default_factory=Generation)
    eval: EvalOptions = field(default_factory=EvalOptions)
    use_flash_attention: bool = True
    load_checkpoint: str = ""             # a MindFormers checkpoint file or rank_* folder
    adapter: str = ""                     # LoRA on top of load_checkpoint: a PEFT folder or a phase=lora run dir
    auto_trans_ckpt: bool = False
    predict_data: List[str] = field(default_factory=list)
    system_prompt: str = "You are a helpful assistant."


@dataclass
class Supports:
    """What a device can execute; adapt.py adapts a run to it and says so (one note per change)."""
    bfloat16: bool = True
    float16: bool = True
    flash_attention: bool = True
    fused_rms_norm: bool = True
    sink_mode: bool = True
    semi_auto_parallel: bool = True       # model / pipeline parallel
    kv_cache: bool = True                 # MindFormers' paged-attention KV cache (Ascend kernels); else kv_cache_cpu.py
    npu_overflow_status: bool = True      # MFTrainOneStepCell's overflow check
    fused_adamw: bool = True              # AdamW in one kernel per parameter (Ascend fuses MindFormers' AdamW)
    lazy_inline: bool = True


@dataclass
class HardwareConfig:
    """The target hardware. cpu executes here; an Ascend profile executes where NPUs are, else plans."""
    name: str = MISSING
    description: str = ""
    device_target: DeviceTarget = MISSING
    devices_per_node: int = 1
    device_memory_gb: float = 0.0         # HBM per device (host RAM for cpu)
    max_device_memory: str = ""           # context.max_device_memory (the budget MindSpore may use)
    peak_tflops: Dict[str, float] = field(default_factory=dict)   # by dtype
    hbm_bandwidth_gbs: float = 0.0
    intra_node_bandwidth_gbs: float = 0.0
    inter_node_bandwidth_gbs: float = 0.0
    max_dataset_workers: Optional[int] = None    # cap on train_dataset.num_parallel_workers
    shared_node_compute: bool = False     # cpu: the devices of a node (msrun workers) share its cores
    jit_level: str = "O1"
    mode: int = 0                         # 0 GRAPH, 1 PYNATIVE
    context: Dict[str, Any] = field(default_factory=dict)        # extra context keys
    estimate: Dict[str, float] = field(default_factory=dict)     # throughput-model constants (estimate/)
    env: Dict[str, str] = field(default_factory=dict)
    supports: Supports = field(default_factory=Supports)
    sources: List[str] = field(default_factory=list)


@dataclass
class DataConfig:
    """Training data: a raw alpaca / chatml / wikitext file prepared on the fly, or a ready MindRecord."""
    name: str = MISSING
    format: DataFormat = MISSING
    input: str = ""                       # a file (raw formats) or a .mindrecord file / folder
    seq_length: int = MISSING
    tokenizer_dir: str = ""               # folder with vocab.json + merges.txt; "" = the shipped real files
    system_prompt: str = "You are a helpful assistant."
    mask_prompt: bool = False             # train on answers only
    pack: bool = False                    # several conversations per row
    eod_between_docs: bool = False        # wiki: <|endoftext|> between articles
    repeat: int = 1
    file_partition: int = 1
    shuffle: bool = False
    num_parallel_workers: int = 8
    cache_dir: str = ""                   # "" = <cache root>/data


@dataclass
class SlurmOptions:
    """What a plan's slurm.sbatch asks Slurm for (one task per node; the nodes come from the layout)."""
    partition: str = ""                   # "" = the cluster's default partition
    time_min: int = 1440                  # the job's time limit
    cpus_per_task: Optional[int] = None   # None = Slurm's default; a node's msrun starts every worker
    exclusive: bool = True                # whole nodes: msrun places one worker per NPU


@dataclass
class ReportOptions:
    """The sweep report: the metric that ranks its jobs ("" = eval_loss where jobs evaluated, else throughput)."""
    rank_by: str = ""


@dataclass
class BenchmarkOptions:
    """eval: benchmarks through lm-evaluation-harness in phase=eval (no tasks: perplexity, as before). Task
    names come from lm-eval's registry (mmlu, ceval-valid, cmmlu, gsm8k, arc_easy, hellaswag, ...) or from the
    user's task YAMLs under include_path; datasets from the Hugging Face datasets cache or local files, never
    fetched at run time."""
    tasks: List[str] = field(default_factory=list)
    num_fewshot: Optional[int] = None      # None: each task's own
    limit: Optional[float] = None          # documents per task: a count, or a fraction below 1 (a quick look)
    batch_size: int = 8                    # requests per forward pass (and sequences per generate)
    apply_chat_template: bool = False      # the Qwen1.5 ChatML template around each prompt (chat models)
    fewshot_as_multiturn: bool = False     # with the template: each few-shot example as a user/assistant turn
    system_instruction: str = ""
    include_path: List[str] = field(default_factory=list)
    seed: int = 1234                       # lm-eval's few-shot sampling and numpy seeds (its default)
    max_length: Optional[int] = None       # tokens a request may hold (longer: cut from the left); None: seq_length
    max_gen_toks: int = 256                # generate_until's default answer length (a task may set its own)
    gen_kwargs: Dict[str, Any] = field(default_factory=dict)   # over every generative task's (lm-eval's --gen_kwargs)
    log_samples: bool = True               # every request and answer in lm-eval's samples files


@dataclass
class K8sVolume:
    """A volume every pod mounts: a node's folder (host_path) or a PersistentVolumeClaim (claim)."""
    name: str = "outputs"
    mount_path: str = ""                  # "" = the same path as host_path
    host_path: str = ""
    claim: str = ""


@dataclass
class K8sOptions:
    """launch.k8s: an AscendJob (MindCluster's ascend-operator on Volcano) written into a plan."""
    enabled: bool = False
    image: str = ""                       # an image with MindSpore, MindFormers, CANN and this qwen15_exp
    namespace: str = "default"
    queue: str = "default"                # Volcano's queue
    name: str = ""                        # "" = from experiment_name, made a DNS-1123 name
    ring_controller: str = "ascend-910b"  # ring-controller.atlas label: Atlas A2 (910B) servers
    npu_resource: str = "huawei.com/Ascend910"
    port: int = 2222                      # ascendjob-port: MindSpore's scheduler port (MS_SCHED_PORT)
    # HCCL rank table instead of msrun's dynamic networking: the operator writes hccl.json into the
    # ConfigMap rings-config-<job> (written with the job) and each Worker pod starts one process per NPU
    rank_table: bool = False
    # the run dir must be the same path in every pod: by default the output root of this machine, mounted
    # from the node at the same path (shared storage); a claim instead with `claim=<pvc>`
    volumes: List[K8sVolume] = field(default_factory=list)
    # what the node scripts take from the shell, set in every pod: TRAIN_DATA, LOAD_CHECKPOINT, RESUME,
    # SRC_STRATEGY (e.g. +launch.k8s.env.TRAIN_DATA=/data/alpaca_mr)
    env: Dict[str, str] = field(default_factory=dict)


@dataclass
class LaunchConfig:
    """Where and how the run starts."""
    mode: LaunchMode = LaunchMode.auto
    master_addr: str = "127.0.0.1"
    master_port: int = 8118
    cluster_time_out: int = 7200
    stop_grace_s: float = 120.0           # after SIGINT/SIGTERM: time the workers get to checkpoint and exit
    join: bool = True                     # node scripts wait for their workers and exit with their status
    node_rank: Optional[int] = None       # set on a cluster node to run that node's share
    rank_table: str = ""                  # an HCCL rank table (hccl.json): per-device processes instead of msrun
    # what a cluster node needs before msrun (Ascend plans): the CANN environment (sourced where the file exists),
    # HCCL's timeouts in seconds (its defaults, 120 s to connect, are short for a 72B checkpoint load on 32
    # nodes; MindFormers' guides use 1800-3600), the network interface HCCL and gloo listen on ("": their own
    # choice), and msrun's core binding
    cann_set_env: str = "/usr/local/Ascend/ascend-toolkit/set_env.sh"
    hccl_connect_timeout: int = 1800
    hccl_exec_timeout: int = 1800
    socket_ifname: str = ""
    bind_core: bool = True
    max_nodes: int = 1024                 # a plan writes one script per node: beyond this it is refused (raise it)
    compile_cache: bool = True            # MindSpore's graph compile cache, keyed by the graph (compile_cache.py)
    compile_cache_max_gb: float = 2.0     # this machine's shared cache folders beyond it go, least recently used first
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    k8s: K8sOptions = field(default_factory=K8sOptions)


@dataclass
class ChatOptions:
    mode: ChatMode = ChatMode.interactive
    questions: List[str] = field(default_factory=list)
    history: bool = True
    seed: Optional[int] = None


@dataclass
class TuneOptions:
    """`python -m qwen15_exp.tune`: the device budget, and what to do with the fastest layouts that fit."""
    devices: Optional[int] = None         # the budget in devices, or
    nodes: Optional[int] = None           # in nodes of hardware.devices_per_node
    global_batch: Optional[int] = None    # samples per step; None: the job's own (batch x dp x accumulation)
    top_k: int = 5
    name: str = ""                        # experiment/tuned/<name>.yaml; "" = from model, phase, hardware, budget
    config_dir: str = ""                  # config folder it goes into ("" = <output root>/conf, on the search path)
    measure: bool = False                 # run the top k for measure_steps steps here and rank by measurement
    measure_steps: int = 8


@dataclass
class TrackingConfig:
    """Experiment tracking (conf/tracking/, `+tracking=mlflow`; qwen15_exp/tracking.py)."""
    backend: str = "none"                 # none | mlflow (set by the tracking group)
    uri: str = ""                         # "" = MLFLOW_TRACKING_URI, else <output root>/mlruns (SQLite)


@dataclass
class Experiment:
    model: ModelConfig = MISSING
    parallel: ParallelConfig = MISSING
    phase: PhaseConfig = MISSING
    hardware: HardwareConfig = MISSING
    data: DataConfig = MISSING
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    paths: Paths = field(default_factory=Paths)
    chat: ChatOptions = field(default_factory=ChatOptions)
    tune: TuneOptions = field(default_factory=TuneOptions)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    report: ReportOptions = field(default_factory=lambda: ReportOptions())
    eval: BenchmarkOptions = field(default_factory=BenchmarkOptions)
    experiment_name: str = "default"
    verbose: bool = False                 # MindFormers' and MindSpore's own console output (qwen15_exp/console.py)
    resume: str = ""                      # a run dir to continue from its last complete checkpoint
    reference: Dict[str, Any] = field(default_factory=dict)   # published figure for this run, if any
    mindformers: Dict[str, Any] = field(default_factory=dict)  # raw MindFormers keys, merged last


@dataclass
class PrepareJob:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    paths: Paths = field(default_factory=Paths)
    output: str = ""
    chatml_output: str = ""       # alpaca only: also write the converter's ChatML JSON Lines here
    progress: bool = True


@dataclass
class ConvertJob:
    model: ModelConfig = MISSING
    paths: Paths = field(default_factory=Paths)
    direction: Direction = Direction.hf2mf
    input: str = MISSING
    output: str = MISSING
    dtype: ConvertDType = ConvertDType.keep
    shard_gb: float = 5.0
    progress: bool = True
    base_model: str = ""                  # lora_peft: the Hugging Face folder of the base (else the run's, if HF)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="experiment_schema", node=Experiment)
    cs.store(name="prepare_schema", node=PrepareJob)
    cs.store(name="convert_schema", node=ConvertJob)
