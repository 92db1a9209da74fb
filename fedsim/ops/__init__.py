"""Operations around runs: child processes and ports, local clusters, TLS certificates, Ray sessions."""
