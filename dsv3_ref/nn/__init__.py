"""The model core (report §2): RMSNorm and SwiGLU (`layers`), RoPE/YaRN (`rope`), MLA (`attention`), DeepSeekMoE
(`moe`) and the Transformer with its MTP modules (`model`). Imports only `dsv3_ref.config` and itself.

No re-exports: import the module you need (the package root re-exports the public classes).
"""
