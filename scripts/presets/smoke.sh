# Preset smoke: a few minutes on 2 CPU cores, what the tests run (the small demo corpus, tiny models).
# Sourced by run_pipeline.sh and reproduce_table.sh: edit a hyper-parameter here, once.
CORPUS=(demo-small) CORPUS_FLAGS=(--max_documents 800)
CLASSIFIER_DATA_LM=(--num_negatives 3000 --od_data_size 1 --train_fraction 0.013 --max_eval_samples 500)
CLASSIFIER_DATA_CLASSIFICATION=(--num_negatives 3000 --od_data_size 1 --train_fraction 0.28 --max_eval_samples 500)
CLASSIFIER=(--target_epsilon 1 --per_device_train_batch_size 512 --gradient_accumulation_steps 2
            --learning_rate 0.1 --num_train_epochs 2)
PRESET_NUM_TOKENS=0.2 BUDGET=(--document_weight 0.7)
PRESET_MODEL_SIZE=nano
PRETRAIN=(--vocab_size 2000 --block_size 64 --per_device_train_batch_size 16 --learning_rate 1e-3
          --max_train_steps 20 --logging_steps 2 --checkpointing_steps 10)
FINETUNE_CLASSIFICATION=(--per_device_train_batch_size 256 --gradient_accumulation_steps 2 --learning_rate 3e-3
                         --num_train_epochs 1 --max_length 48 --freeze embeddings --train_fraction 0.2)
CEILING_CLASSIFICATION=()
FINETUNE_LM=(--per_device_train_batch_size 256 --gradient_accumulation_steps 2 --learning_rate 3e-3
             --num_train_epochs 1 --max_length 32 --train_fraction 0.009 --max_eval_samples 200)
# --privacy_unit sender: batch sizes count senders
SENDER_CLASSIFIER_DATA=(--num_negatives 1000 --train_fraction 0.05)
SENDER_CLASSIFIER=(--per_device_train_batch_size 128 --gradient_accumulation_steps 2 --max_examples_per_unit 4)
SENDER_FINETUNE=(--per_device_train_batch_size 32 --gradient_accumulation_steps 2 --train_fraction 0.02
                 --max_examples_per_unit 4)
TARGETS=(chat demo) DEFAULT_TASK=lm DEFAULT_EPSILON=4
AUDIT_CANARIES=200  # --audit: white-box canaries per DP stage
