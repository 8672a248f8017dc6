from magvit2.bench import main

raise SystemExit(main())
