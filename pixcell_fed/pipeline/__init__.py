"""The site agent's end-to-end job: slides -> tiles -> embeddings -> T/H split -> synthetic tiles -> audit -> bundle."""
