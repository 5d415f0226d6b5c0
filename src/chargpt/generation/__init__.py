"""Generation: sampling settings, the draw of each token, the decode loops (torch and native)."""
