"""tailor: specialize one weight-sharing supernet to (superclass, budget, device)."""
