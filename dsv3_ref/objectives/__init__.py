"""Training objectives' math, above the model core and below the trainer: next-token cross-entropy (`lm`),
multi-token prediction (`mtp`, report §2.2), expert load balancing (`balance`, report §2.1.2) and the V3.2-Exp
lightning indexer's KL objective (`indexer`, V3.2-Exp report §2.1)."""
