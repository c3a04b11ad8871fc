"""Every file and folder name an artifact uses, in one place."""

ARTIFACTS_DIR = "artifacts"
WAREHOUSE_FILE = "warehouse.duckdb"
MANIFEST = "manifest.json"
SHARD_RECORDS_DIR = "_shards"
TMP_PREFIX = ".tmp-"

# cache stage
CACHE_TOKENS_DIR = "tokens"
CACHE_PROMPTS_DIR = "prompts"
CACHE_Z_DIR = "z"


def shard_name(index: int) -> str:
    """Return the file stem of shard `index`."""
    return f"shard-{index:05d}"


def layer_dir(layer: int) -> str:
    """Return the hive partition folder of one layer."""
    return f"layer={layer}"

# train stage
LENSES_DIR = "lenses"
TRAIN_SPEC = "spec.json"
TRAIN_CURVE = "curve.jsonl"
TRAIN_FIDELITY = "fidelity.json"
TRAIN_RESULT = "result.json"
CHECKPOINTS_DIR = "checkpoints"
FIDELITY_HEATMAP = "fidelity_heatmap.png"

# decode stage
DECODINGS_DIR = "decodings"
READOUTS_DIR = "readouts"
TOKEN_TOXICITY_FILE = "token_toxicity.parquet"  # the one vocabulary toxicity (attribute, select, intervene read it)

# attribute stage
HEAD_SCORES_FILE = "head_scores.parquet"
PROMPT_GROUPS_FILE = "prompt_groups.parquet"
TOKEN_FLAGS_FILE = "token_flags.parquet"  # per token: in the lexicon, toxic (the scores stay decode's)
TOP_HEADS_REPORT = "top_heads.md"
ATTRIBUTION_SUMMARY = "attribution.json"


def heatmap_name(method: str) -> str:
    """Return the PNG file of one score method's layers x heads heatmap."""
    return f"heatmap_{method}.png"

# select stage (its head scores are HEAD_SCORES_FILE too)
PROMPT_SPLITS_FILE = "prompt_splits.parquet"
SELECTION_PATH_FILE = "selection_path.parquet"
STEERING_DIRECTIONS_FILE = "steering_directions.safetensors"  # select: per-head unit directions, sigmas
STEERING_TRIALS_FILE = "steering_trials.parquet"  # select: every steering condition measured, and the chosen ones
STEERING_SCORES_FILE = "steering_scores.parquet"  # select: per-head first-order steering effects, probe AUROC
SELECT_REPORT = "selection.md"

# intervene stage
GENERATIONS_DIR = "generations"
PPL_DIR = "perplexity"
HEAD_MEANS_FILE = "head_means.safetensors"
INTERVENTIONS_FILE = "interventions.parquet"
INTERVENTION_REPORT = "interventions.md"
INTERVENTION_PLOT = "toxicity_vs_ppl.png"

# the pipeline's stages, in order (each one's versions live under artifacts/<stage>/): the names of
# loralens/tasks/registry.py's REGISTRY, kept here as a plain tuple for importers that must stay light (the CLI) or
# may not import tasks (warehouse); tests/test_registry.py asserts the two agree
STAGES = ("cache", "train", "decode", "attribute", "select", "intervene")
