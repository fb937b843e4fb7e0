# Preset cpu: the demo with 16M tokens of pre-training per variant (the learning curve's largest length),
# classification by default; each pre-training about 30 minutes on 2 cores, about 75 minutes per seed in all.
# Sourced by run_pipeline.sh and reproduce_table.sh: edit a hyper-parameter here, once.
source "$(dirname "${BASH_SOURCE[0]}")/demo.sh"
PRESET_PRETRAIN_TOKENS=16 DEFAULT_TASK=classification
