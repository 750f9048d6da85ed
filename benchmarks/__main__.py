from carzero_fast.bench import main

raise SystemExit(main())
