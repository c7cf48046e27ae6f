"""Adversarial attacks of stages 5 and 6: `uat` (universal triggers) and `hotflip` (greedy token
flips, with a query-only random-candidate control), on shared machinery in `common` (allowed
vocabulary, the original-text objective, embedding gradients, batched exact scoring), `units`
(resumable work) and `effects` (absolute-first effect summaries). Output schemas: SCHEMA.md."""
