"""What the engine adapters share (vLLM and SGLang): runtime-patch plumbing
(:mod:`.patching`), the resilience settings every engine reads the same way
(:mod:`.settings`), the CLI flags (:mod:`.flags`), an instance's private directory
(:mod:`.instance`) and small process helpers (:mod:`.procs`).

Engine-neutral: nothing here imports vLLM or SGLang; each adapter passes its own names in.
"""
