# Preset paper: the reference hyper-parameters on hub data, for GPUs; with --task lm it needs --target.
# Sourced by run_pipeline.sh and reproduce_table.sh: edit a hyper-parameter here, once.
CORPUS=(wikipedia bookcorpus) CORPUS_FLAGS=()
CLASSIFIER_DATA_LM=(--num_negatives 336745) CLASSIFIER_DATA_CLASSIFICATION=(--num_negatives 336745)  # 5 x 67,349
CLASSIFIER=(--backbone transformer --model_name_or_path bert-base-uncased --noise_multiplier 1.4
            --per_device_train_batch_size 64 --gradient_accumulation_steps 32 --learning_rate 1e-3
            --num_train_epochs 3)
PRESET_NUM_TOKENS=40 BUDGET=()
PRESET_MODEL_SIZE=tiny
PRETRAIN=(--block_size 128 --per_device_train_batch_size 32 --learning_rate 3e-4 --max_train_steps 1000000
          --checkpointing_steps 10000)
FINETUNE_CLASSIFICATION=(--per_device_train_batch_size 32 --gradient_accumulation_steps 64 --learning_rate 1e-3
                         --num_train_epochs 30)
CEILING_CLASSIFICATION=()
FINETUNE_LM=(--per_device_train_batch_size 32 --gradient_accumulation_steps 64 --learning_rate 1e-3
             --num_train_epochs 30 --max_length 128)
# --privacy_unit sender: batch sizes count senders (up to 8 messages each per step)
SENDER_CLASSIFIER_DATA=() SENDER_CLASSIFIER=(--max_examples_per_unit 8) SENDER_FINETUNE=(--max_examples_per_unit 8)
TARGETS=("" glue/sst2) DEFAULT_TASK=lm DEFAULT_EPSILON=4
AUDIT_CANARIES=1000  # --audit: white-box canaries per DP stage
