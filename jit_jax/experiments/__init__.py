"""Small experiments that reproduce claims of the JiT paper at toy scale."""
