# Preset demo (the default): the offline demo data, about 15 minutes on 2 CPU cores.
# Sourced by run_pipeline.sh and reproduce_table.sh: edit a hyper-parameter here, once.
CORPUS=(demo) CORPUS_FLAGS=()
# stage 2: a fixed number of public negatives (never derived from the private count); about 5 per positive
CLASSIFIER_DATA_LM=(--num_negatives 100000 --train_fraction 0.09 --max_eval_samples 2000)
CLASSIFIER_DATA_CLASSIFICATION=(--num_negatives 50000 --max_eval_samples 2000)
CLASSIFIER=(--target_epsilon 1 --per_device_train_batch_size 512 --gradient_accumulation_steps 16
            --learning_rate 0.1 --num_train_epochs 6)
PRESET_NUM_TOKENS=0.1 BUDGET=(--document_weight 0.7)
PRESET_MODEL_SIZE=micro
PRETRAIN=(--vocab_size 4096 --block_size 128 --per_device_train_batch_size 32 --learning_rate 1e-3
          --max_train_steps 300 --checkpointing_steps 100)
# DP: only the head (and final LayerNorm), on the mean-pooled features: the recipe search in docs/results.md. The
# non-private ceiling trains every parameter on the last token in batches of 32 (about 1,000 steps), the best
# of the recipes tried without noise (results/classification_tuning/tuning_ceiling_random16M_seed0.md).
FINETUNE_CLASSIFICATION=(--per_device_train_batch_size 256 --gradient_accumulation_steps 4 --learning_rate 1e-1
                         --num_train_epochs 10 --max_length 64 --freeze body --pooling mean)
CEILING_CLASSIFICATION=(--freeze none --pooling last --per_device_train_batch_size 32 --gradient_accumulation_steps 1
                        --learning_rate 3e-4 --num_train_epochs 3)
FINETUNE_LM=(--per_device_train_batch_size 256 --gradient_accumulation_steps 4 --learning_rate 3e-3
             --num_train_epochs 3 --max_length 48 --train_fraction 0.05 --max_eval_samples 2000)
# --privacy_unit sender: batch sizes count senders (each brings at most --max_examples_per_unit of their messages to a
# step); every message of the training senders is used (no --train_fraction), and fewer public negatives keep the
# classifier's senders and negatives about as balanced as its examples are per message.
SENDER_CLASSIFIER_DATA=(--num_negatives 6000)
SENDER_CLASSIFIER=(--per_device_train_batch_size 128 --gradient_accumulation_steps 8 --num_train_epochs 10
                   --max_examples_per_unit 8)
SENDER_FINETUNE=(--per_device_train_batch_size 32 --gradient_accumulation_steps 4 --num_train_epochs 4
                 --max_examples_per_unit 8)
TARGETS=(chat demo) DEFAULT_TASK=lm DEFAULT_EPSILON=4
AUDIT_CANARIES=1000  # --audit: white-box canaries per DP stage
