"""runledger's HTTP front door (``runledger serve``): signed appends from producers in any language, and a read
API over the projection and the proofs. The contract is docs/http.md and the OpenAPI document at /openapi.json."""
