"""CogReasoner streaming inference: clustering, event compression, dialogue retrieval, sessions."""
