"""Adversarial attacks of stages 5 and 6: `uat` (universal triggers; one restart's search in
`trigger_search`) and `hotflip` (greedy token flips, with a query-only random-candidate control;
one text's search in `flip_search`, its exact candidate scoring in `flip_scoring`) and `gcg`
(universal GCG with a random control; one restart's resumable search in `gcg_search`, its stages in
`gcg_stage`; restarts as replicates in `replicates`, budget curves in `curves`), on shared
machinery in `sequences` (allowed vocabulary, context prefix, padded batches with target masks),
`scoring` (the original-text objective, embedding gradients, batched exact scoring), `units`
(resumable work) and `effects` (absolute-first effect summaries). Output schemas: SCHEMA.md."""
