;; membomb: starts fine, then grows its memory by 1 MiB at a time, forever, ignoring
;; failures. The store's memory limit (memory_bytes_max) is what stops it.
(module
  (memory (export "memory") 1)

  (func (export "on_tick")
    (loop $more
      (drop (memory.grow (i32.const 16)))   ;; 16 pages of 64 KiB
      (br $more)))
)
