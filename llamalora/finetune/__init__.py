"""`llamalora finetune`: train a LoRA adapter on the CPU from a text file, the base model left in its own type.

model.py holds the forward and backward pass of the llama block (gradients for LoRA A and B only), tiles.py
the base weights dequantized tile by tile inside the matmuls, optim.py AdamW and the learning-rate schedule,
data.py llama.cpp finetune's samples and batches, train.py the loop, checkpoints and adapter output.
"""
