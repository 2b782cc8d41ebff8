"""Parameter-efficient adaptation: LoRA (`lora.py`), soft prompts (`prompt_tuning.py`), task heads and
freezing (`heads.py`), and loading bases and fine-tuned runs (`load.py`). `lmforge.finetune` composes
them with a base model."""
