"""Training objectives' math, above the model core and below the trainer: next-token cross-entropy (`lm`),
multi-token prediction (`mtp`, report §2.2) and expert load balancing (`balance`, report §2.1.2)."""
