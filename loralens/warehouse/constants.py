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
