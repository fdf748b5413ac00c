"""Data-free QALoRA distillation (EfficientDM).

    accelerate launch examples/distill.py                      # the embedded digits DDPM at W4A4, end to end
    accelerate launch examples/distill.py --pretrained_model_name_or_path path/to/sd-pipeline --max_train_steps 2000

Run with ``--help`` for every option.
"""

from diffusers_qalora.distill.cli import main

if __name__ == "__main__":
    main()
